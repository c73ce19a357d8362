#!/usr/bin/env bash
# Table 2: CIFAR10 to convergence with ERM, PGD-2, PGD-10, FAT, FOSC and Amata.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_table2_cifar10 "$@"
