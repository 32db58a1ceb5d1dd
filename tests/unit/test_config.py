def test_x():
    import proxycore.config  # noqa
