"""The applications built on the core: the ``freeloc`` command, video generation and the pictures.

* ``freeloc.app.cli``: the ``freeloc`` command (``explain``, ``demo``, ``generate``, ``probe``);
* ``freeloc.app.video``: ``freeloc generate`` (one method, or several compared) and ``freeloc demo``, and
  the mp4 writing;
* ``freeloc.app.plots``: the PNGs (explain, probe scores, the demo's report and frame strips);
* ``freeloc.app.progress``: the command's tqdm progress bars.

They need the ``app`` extra (``pip install "freeloc[app]"``: matplotlib, tqdm, imageio, Pillow), and
the ``shapes`` or ``diffusers`` extra for the models they run. The applications import the core; the
core never imports them.
"""
