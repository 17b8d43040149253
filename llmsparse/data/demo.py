"""The bundled demo: stories260K (a 260K-parameter Llama) and a TinyStories sample, so a fresh machine can prune
offline (``llmsparse prune`` with no model)."""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_MODEL = DEMO_DIR / "stories260K"
DEMO_TEXT = DEMO_DIR / "tinystories_sample.txt"
DEMO_NAME = "stories260K"
