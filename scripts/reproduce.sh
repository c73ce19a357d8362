#!/usr/bin/env bash
# Reproduce one published table: the whole sweep (amata-run -m experiment=NAME), then amata-report
# on the sweep directory (report.md, report.csv and the error-curve PNGs land beside the job
# directories). Usage: scripts/reproduce.sh NAME [amata-run overrides...], e.g.
#   scripts/reproduce.sh paper_table2_cifar10 dataset.download=true seed=0,1,2
# AMATA_SWEEP_DIR chooses the sweep directory. Costs and what was run here: README, "Reproducing
# the paper". scripts/reproduce_NAME.sh is this script with NAME filled in.
set -uo pipefail
experiment="${1:?usage: reproduce.sh EXPERIMENT [overrides...]}"
shift
default_dir="${AMATA_OUTPUT_DIR:-outputs}/multirun/${experiment}/$(date +%Y-%m-%d/%H-%M-%S)"
sweep_dir="${AMATA_SWEEP_DIR:-${default_dir}}"
amata-run -m "experiment=${experiment}" "hydra.sweep.dir=${sweep_dir}" "$@"
status=$?
# A failed job still leaves its directory, and the report lists it as failed. The exit status is
# the sweep's, or the report's when the sweep succeeded.
if [ -d "${sweep_dir}" ]; then
  amata-report "${sweep_dir}"
  report_status=$?
  if [ "${status}" -eq 0 ]; then status=${report_status}; fi
fi
exit "${status}"
