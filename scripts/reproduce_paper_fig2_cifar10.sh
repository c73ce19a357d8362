#!/usr/bin/env bash
# Figure 2 (left): PGD-10 vs Amata (K 2 -> 10) on CIFAR10 to 55% robust error.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_fig2_cifar10 "$@"
