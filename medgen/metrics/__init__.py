"""Image-quality metrics (PSNR, SSIM, MS-SSIM, NRMSE) and foreground masks.

Import from the submodules (``medgen.metrics.quality``, ``medgen.metrics.masks``); importing
this package stays cheap.
"""
