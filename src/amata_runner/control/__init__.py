"""The inner loop's control: annealing schedules, the adaptive rule, the criterion C, landscapes.

Everything that decides or scores the control (K, alpha) lives here; nothing here touches the
model's weights.  The package imports no torch by itself: ``criterion_config`` is read while a
command line is checked.
"""
