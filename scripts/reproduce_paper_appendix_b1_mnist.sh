#!/usr/bin/env bash
# Appendix B.1: PGD-40 vs Amata on MNIST, curves under PGD-20, PGD-40 and PGD-60.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_appendix_b1_mnist "$@"
