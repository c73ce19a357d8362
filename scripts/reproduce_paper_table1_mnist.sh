#!/usr/bin/env bash
# Table 1 (MNIST, LeNet): criterion C, robustness and time, Amata settings 1-2 vs PGD-10/20/40.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_table1_mnist "$@"
