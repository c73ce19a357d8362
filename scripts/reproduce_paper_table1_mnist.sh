#!/usr/bin/env bash
# Table 1 (MNIST, LeNet): criterion C, robustness and time, Amata settings 1-2 vs PGD-10/20/40.
# Runs the whole sweep (amata-run -m experiment=paper_table1_mnist), then amata-report on the
# sweep directory (report.md, report.csv and the error-curve PNGs land beside the job directories).
# Extra arguments are passed to amata-run, e.g.
#   scripts/reproduce_paper_table1_mnist.sh dataset.download=true
# AMATA_SWEEP_DIR chooses the sweep directory. Costs and what was run here: docs/reproducing.md.
set -uo pipefail
experiment=paper_table1_mnist
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
