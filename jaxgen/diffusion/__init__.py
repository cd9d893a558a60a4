"""Pure diffusion math: schedules, the forward process and loss, lax.scan samplers, editing."""
from jaxgen.diffusion.editing import ddim_invert, img2img, inpaint, interpolate
from jaxgen.diffusion.process import (
                                      PREDICTIONS,
                                      WEIGHTINGS,
                                      diffusion_loss,
                                      eps_from_x0,
                                      loss_weight,
                                      q_sample,
                                      snr,
                                      target,
                                      to_x0_eps,
)
from jaxgen.diffusion.samplers import (
                                      SAMPLERS,
                                      SPACINGS,
                                      SamplerState,
                                      ddim_update,
                                      ddpm_update,
                                      dpmpp_2m_update,
                                      guided_denoiser,
                                      make_step,
                                      make_timesteps,
                                      sample,
                                      sampling_options,
                                      step_inputs,
)
from jaxgen.diffusion.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "PREDICTIONS", "SAMPLERS", "SCHEDULES", "SPACINGS", "WEIGHTINGS", "SamplerState", "Schedule",
    "ddim_invert", "ddim_update", "ddpm_update", "diffusion_loss", "dpmpp_2m_update",
    "eps_from_x0", "guided_denoiser", "img2img", "inpaint", "interpolate", "loss_weight",
    "make_schedule", "make_step", "make_timesteps", "q_sample", "sample", "sampling_options",
    "snr", "step_inputs", "target", "to_x0_eps",
]
