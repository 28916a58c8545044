"""The benchmark (tooling, not the user client): ``python -m bench`` or ``make bench``.

``measure`` times the pieces, the neighbour core, diffusers' own pipeline and the served requests;
``stats`` turns those records into the figures; ``quality`` is PSNR/SSIM; ``report`` writes Markdown,
JSON and the plot; ``__main__`` is the command line that runs the rounds.
"""
