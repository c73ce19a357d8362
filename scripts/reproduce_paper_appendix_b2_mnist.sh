#!/usr/bin/env bash
# Appendix B.2: Amata's linear schedule vs the exponential one (eta 0.1 to 5) on MNIST.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_appendix_b2_mnist "$@"
