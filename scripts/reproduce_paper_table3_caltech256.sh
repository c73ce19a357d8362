#!/usr/bin/env bash
# Table 3 (top): Caltech256, ResNet-18, ERM / PGD-20 / Amata (K 10 -> 20) under PGD-5/20/100.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_table3_caltech256 "$@"
