"""The one implementation of every step: load → operate → save (prune, export, finetune, moefy, eval, and the
read-only ppl and inspect). The command line, recipes and the Python API all call these."""
