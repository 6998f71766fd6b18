"""The ``zoompipe`` command line: thin click wrappers over the library."""
