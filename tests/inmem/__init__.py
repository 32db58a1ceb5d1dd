"""The scripted-stream tier: proxy logic driven by scripted byte streams, no sockets.

Tests here never open a socket, so they may use ``autojump_clock`` (trio's
``MockClock(autojump_threshold=0)``) freely: no real I/O can race the clock.
See :mod:`tests.inmem.scripted`.
"""
