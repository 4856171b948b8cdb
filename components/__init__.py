"""KFP components: one thin lightweight Python component per stage (installed as ``kubellm.components``).

Each component body imports from ``kubellm`` and makes one call into it; the logic lives in the library.
"""
