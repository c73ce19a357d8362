"""Run plumbing: device set-up, precision, distributed ranks, the two cost axes (passes and the
train-only clock), signals, the NaN guard, and every file of a run directory (lock, status,
checkpoints and what they hold, provenance).

None of it knows what a training method does; the engine and the CLIs combine these parts.
"""
