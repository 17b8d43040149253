"""Text in: calibration documents and windows, evaluation text, the bundled demo model and text."""
