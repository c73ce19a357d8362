#!/usr/bin/env bash
# Section 3.2: Fast vs Amata+Fast on CIFAR10.
# Runs the whole sweep (amata-run -m experiment=paper_amata_fast_cifar10), then amata-report on the
# sweep directory (report.md, report.csv and the error-curve PNGs land beside the job directories).
# Extra arguments are passed to amata-run, e.g.
#   scripts/reproduce_paper_amata_fast_cifar10.sh dataset.download=true
# AMATA_SWEEP_DIR chooses the sweep directory. Costs and what was run here: docs/reproducing.md.
set -uo pipefail
experiment=paper_amata_fast_cifar10
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
