#!/usr/bin/env bash
# Section 3.2: Fast vs Amata+Fast on CIFAR10.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_amata_fast_cifar10 "$@"
