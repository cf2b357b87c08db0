"""The data side of trainerd: corpus store, encoding, sampling, rings and producers.

Nothing in this package imports torch, so producer processes start fast and stay small.
"""
