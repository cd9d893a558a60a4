"""Pure diffusion math: schedules, the forward process and loss, lax.scan samplers, editing."""
from jaxgen.diffusion import flow
from jaxgen.diffusion.editing import (
                                      ddim_invert,
                                      denoise,
                                      denoising_timesteps,
                                      flow_img2img,
                                      img2img,
                                      inpaint,
                                      interpolate,
                                      timestep_for_sigma,
)
from jaxgen.diffusion.process import (
                                      PREDICTIONS,
                                      WEIGHTINGS,
                                      diffusion_loss,
                                      eps_from_x0,
                                      eps_from_x0_at,
                                      loss_weight,
                                      q_sample,
                                      snr,
                                      target,
                                      to_x0_eps,
                                      to_x0_eps_at,
)
from jaxgen.diffusion.samplers import (
                                      FLOW_SAMPLERS,
                                      GRID_OPTIONS,
                                      KARRAS_SAMPLERS,
                                      SAMPLERS,
                                      SPACINGS,
                                      Grid,
                                      SamplerState,
                                      ddim_update,
                                      ddpm_update,
                                      dpmpp_2m_update,
                                      euler_ancestral_update,
                                      flow_grid,
                                      flow_grid_from,
                                      flow_shift,
                                      guided_denoiser,
                                      make_grid,
                                      make_step,
                                      make_timesteps,
                                      resolution_shift,
                                      sample,
                                      sampling_options,
                                      step_inputs,
                                      threshold_x0,
)
from jaxgen.diffusion.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "FLOW_SAMPLERS", "GRID_OPTIONS", "KARRAS_SAMPLERS", "PREDICTIONS", "SAMPLERS", "SCHEDULES",
    "SPACINGS", "WEIGHTINGS", "Grid", "SamplerState", "Schedule", "ddim_invert", "ddim_update",
    "ddpm_update", "denoise", "denoising_timesteps", "diffusion_loss", "dpmpp_2m_update",
    "eps_from_x0", "eps_from_x0_at", "euler_ancestral_update", "flow", "flow_grid",
    "flow_grid_from", "flow_img2img", "flow_shift", "guided_denoiser", "img2img", "inpaint",
    "interpolate",
    "loss_weight", "make_grid", "make_schedule", "make_step", "make_timesteps", "q_sample",
    "resolution_shift", "sample", "sampling_options", "snr", "step_inputs", "target",
    "threshold_x0", "timestep_for_sigma", "to_x0_eps", "to_x0_eps_at",
]
