"""Monkey-patches of SGLang for the maia platform; each module says why and when it can go."""
