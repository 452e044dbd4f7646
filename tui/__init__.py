"""Everything a person sees: the `qlc` CLI and the Textual console. Never imports torch."""
