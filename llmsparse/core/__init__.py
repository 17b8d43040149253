"""What every stage shares: errors, settings checks, devices, progress, atomic output folders, llmsparse.json.

Nothing here imports torch at module level except ``devices`` and ``memory``, so that the command line can build
its parser and answer ``--help`` without it.
"""
