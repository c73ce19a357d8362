#!/usr/bin/env bash
# Figure 2 (right): YOPO-5-10 vs Amata+YOPO (K 2 -> 5) on MNIST to 94% adversarial accuracy.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_fig2_yopo_mnist "$@"
