from setuptools import find_packages, setup

# The click commands live in the top-level `cli/` folder of the repository and are
# installed as `zoompipe.cli`, so that nothing named plain `cli` lands in site-packages.
setup(
    packages=find_packages(include=["zoompipe", "zoompipe.*"]) + ["zoompipe.cli"],
    package_dir={"zoompipe.cli": "cli"},
)
