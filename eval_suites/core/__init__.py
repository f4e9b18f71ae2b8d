"""What every evaluation frontend shares: the decoder protocol (``decoder``), the method
registry (``methods``), the POPE scorer (``pope``) and the CHAIR scorer (``chair``).

The toy world, the paper's protocols (``reproduce``), the peers and the lmms-eval plugin build on
it; nothing here knows the toy world.
"""
