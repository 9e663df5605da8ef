"""The paper's numbers (Spatia Tables 3-7), copied from its tables; data only.

Keys: table3 = {method: metrics}; table4 = {none|proj|refs|both: metrics}; table5 = {K: metrics};
table6 = {memory|no_memory: {clips: metrics}}; table7 = {voxel cube side in metres: metrics}.
Metrics: psnr_c / ssim_c / lpips_c (first vs. last frame of a closed loop), match_acc (RoMa
match accuracy), camera_score (WorldScore), psnr / ssim / lpips (Table 7, all frames).
"""

__all__ = ["PAPER"]

PAPER = {
    "table3": {
        "ViewCrafter": {"psnr_c": 14.79, "ssim_c": 0.481, "lpips_c": 0.365, "match_acc": 0.447},
        "FlexWorld": {"psnr_c": 12.20, "ssim_c": 0.428, "lpips_c": 0.598, "match_acc": 0.377},
        "Voyager": {"psnr_c": 17.66, "ssim_c": 0.540, "lpips_c": 0.380, "match_acc": 0.507},
        "Spatia": {"psnr_c": 19.38, "ssim_c": 0.579, "lpips_c": 0.213, "match_acc": 0.698},
    },
    "table4": {
        "none": {"camera_score": 58.81, "psnr_c": 15.55, "ssim_c": 0.444, "lpips_c": 0.379},
        "proj": {"camera_score": 80.13, "psnr_c": 17.18, "ssim_c": 0.500, "lpips_c": 0.295},
        "refs": {"camera_score": 61.38, "psnr_c": 15.64, "ssim_c": 0.444, "lpips_c": 0.393},
        "both": {"camera_score": 84.47, "psnr_c": 19.38, "ssim_c": 0.579, "lpips_c": 0.213},
    },
    "table5": {
        1: {"psnr_c": 17.50, "ssim_c": 0.537, "lpips_c": 0.284, "match_acc": 0.592},
        3: {"psnr_c": 17.85, "ssim_c": 0.540, "lpips_c": 0.275, "match_acc": 0.606},
        5: {"psnr_c": 18.48, "ssim_c": 0.556, "lpips_c": 0.248, "match_acc": 0.640},
        7: {"psnr_c": 19.38, "ssim_c": 0.579, "lpips_c": 0.213, "match_acc": 0.698},
    },
    "table6": {
        "no_memory": {
            2: {"camera_score": 56.87, "psnr_c": 13.00, "ssim_c": 0.377, "lpips_c": 0.521},
            4: {"camera_score": 46.43, "psnr_c": 11.32, "ssim_c": 0.328, "lpips_c": 0.611},
            6: {"camera_score": 49.97, "psnr_c": 10.74, "ssim_c": 0.310, "lpips_c": 0.644},
        },
        "memory": {
            2: {"camera_score": 84.47, "psnr_c": 19.38, "ssim_c": 0.579, "lpips_c": 0.213},
            4: {"camera_score": 83.97, "psnr_c": 18.23, "ssim_c": 0.546, "lpips_c": 0.253},
            6: {"camera_score": 83.41, "psnr_c": 18.04, "ssim_c": 0.541, "lpips_c": 0.259},
        },
    },
    "table7": {
        0.01: {"psnr": 18.58, "ssim": 0.646, "lpips": 0.254},
        0.03: {"psnr": 17.10, "ssim": 0.614, "lpips": 0.313},
        0.05: {"psnr": 16.35, "ssim": 0.596, "lpips": 0.349},
        0.07: {"psnr": 15.97, "ssim": 0.585, "lpips": 0.370},
    },
}
