"""amata-runner: adversarial training experiments (PGD, Amata and friends) from one command line."""

__version__ = "0.1.0"
