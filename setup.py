"""Only here to ship the auto-patch bootstrap (moe_patch_auto.pth) into site-packages; see setup.cfg.

A wheel carries the .pth at its root (build_lib). An editable install (pip install -e ., PEP 660) does not
pack build_lib: setuptools' editable_wheel points the install command's install_lib at the unpacked wheel,
whose files are installed into site-packages as they are, so the .pth goes there.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "moe_patch_auto.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        target = self.build_lib
        if getattr(self, "editable_mode", False):
            target = self.get_finalized_command("install").install_lib
        self.copy_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_patch", PTH),
                       os.path.join(target, PTH))


setup(cmdclass={"build_py": BuildWithPth})
