"""lm-eval task configs that read local benchmark files (installed as ``llmsparse.eval_tasks``)."""
