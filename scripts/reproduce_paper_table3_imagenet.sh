#!/usr/bin/env bash
# Table 3 (bottom): ImageNet, ResNet-50, Free-4 vs Amata+Free (m 2 -> 4) under PGD-10/20/50.
# The sweep, then amata-report on it; extra arguments go to amata-run (see scripts/reproduce.sh).
exec "$(dirname "$0")/reproduce.sh" paper_table3_imagenet "$@"
