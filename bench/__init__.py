"""The benchmark (tooling, not the user client): ``python -m bench`` or ``make bench``.

``measure`` times the pieces, the neighbour core, diffusers' own pipeline and the served requests;
``stats`` turns those records into the figures; ``quality`` is PSNR/SSIM; ``report`` writes Markdown,
JSON and the plot; ``__main__`` is the command line that runs the rounds. On a trained shape model,
``fidelity`` scores every mode (PSNR/SSIM, prompt adherence, tau sources, the k ablation; ``frozen_feed`` is the
reference's SD3 bug for comparison) and ``tune_knobs`` chooses its hybrid knobs from its rel-MAE curves.
"""
