"""Screens: the main one (the panes) and the modal dialogs."""
