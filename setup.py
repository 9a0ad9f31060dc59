"""Only here to ship the auto-patch bootstrap (moe_patch_auto.pth) into site-packages; see setup.cfg."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "moe_patch_auto.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_patch", PTH),
                       os.path.join(self.build_lib, PTH))


setup(cmdclass={"build_py": BuildWithPth})
