"""Scripts run with python -m: train the bundled models, regenerate the reference reports."""
