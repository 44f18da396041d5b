"""The pure core of edp: events, grouping rules and the batch lifecycle.

Nothing in this package does I/O or reads a clock: time always comes in as an
argument, so the whole lifecycle can be tested without sleeping.
"""
