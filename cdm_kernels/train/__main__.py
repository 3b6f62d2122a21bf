"""`python -m cdm_kernels.train`: the training command line (cdm_kernels.train.cli)."""

from .cli import main

if __name__ == "__main__":
    main()
