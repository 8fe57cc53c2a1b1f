"""Options of `run.py video`, `train temporal` and `train interpolation` (torch-free, for a fast --help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.config import group, option
from pipelines.errors import UserError, not_a_file
from pipelines.options import SamplingOptions
from pipelines.options import TrainingOptions

MAX_FRAMES = 256  # longer than the trained window: temporal attention runs in overlapping windows
MIN_FPS, MAX_FPS = 0.1, 1000.0
MASK_MODES = ("none", "first", "interpolation", "mixed")
LOSS_WEIGHTINGS = ("eps", "v")
WEIGHTS_NAME = "temporal_layers.safetensors"  # a folder of temporal layers: their weights
CONFIG_NAME = "temporal_config.json"  # and the LayerOptions they were made with


def is_temporal_folder(path: str | Path) -> bool:
    """Whether `path` holds temporal layers as `train temporal` saves them."""
    return all((Path(path) / name).is_file() for name in (WEIGHTS_NAME, CONFIG_NAME))


@dataclass
class VideoConfig(SamplingOptions):
    frames: int = option(16, f"number of frames (1..{MAX_FRAMES})")
    fps: float = option(8.0, "frames per second of the clip (also conditions the motion speed); with interpolate=k "
                             "the video is written at k * fps, so it lasts as long and moves more smoothly")
    motion: Optional[str] = option(None, "trained temporal layers, or an AnimateDiff MotionAdapter (default: the "
                                         "model preset's `motion:`)")
    interpolate: int = option(1, "frame interpolation factor k: F frames become (F - 1) * k + 1 (needs a masked-frame model)")
    image: Optional[str] = option(None, "animate this image: it becomes the first frame (needs a masked-frame model)")
    masked_motion: Optional[str] = option(None, "masked-frame model from `train interpolation` (default: the model "
                                                "preset's `interpolation:`)")
    interpolate_strength: float = option(0.3, "interpolate=: 1 fills the frames in between from pure noise; lower starts "
                                              "them from their neighbours' blend noised that far up the schedule (SDEdit)")
    save_frames: bool = option(False, "also write every frame as a PNG under frames/")

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.frames <= MAX_FRAMES:
            raise UserError(f"frames must be between 1 and {MAX_FRAMES}, got {self.frames}")
        if not MIN_FPS <= self.fps <= MAX_FPS:  # an MP4 or GIF cannot hold a slower or faster rate
            raise UserError(f"fps must be between {MIN_FPS} and {MAX_FPS}, got {self.fps}")
        if self.interpolate < 1:
            raise UserError(f"interpolate must be at least 1 (1 = no interpolation), got {self.interpolate}")
        if (self.frames - 1) * self.interpolate + 1 > 4 * MAX_FRAMES:
            raise UserError(f"frames={self.frames} with interpolate={self.interpolate} makes more than {4 * MAX_FRAMES} frames")
        if self.output_fps > MAX_FPS:  # the rate the MP4 and GIF are written at
            raise UserError(f"fps={self.fps} with interpolate={self.interpolate} writes the video at {self.output_fps} "
                            f"frames per second; keep fps * interpolate <= {MAX_FPS:g}")
        if not 0 < self.interpolate_strength <= 1:
            raise UserError(f"interpolate_strength must be in (0, 1], got {self.interpolate_strength}")
        if self.image is not None and not Path(self.image).is_file():
            raise not_a_file(f"image={self.image}", self.image)

    @property
    def output_fps(self) -> float:
        """Frame rate of the written video: interpolate=k puts k - 1 frames between each pair, 1 / (k fps) apart."""
        return self.fps * self.interpolate


@dataclass
class LayerOptions:
    """The temporal layers' choices that a training run makes (saved with them in temporal_config.json)."""

    cond_dim: int = option(128, "width of the fps + pooled-text conditioning")
    word_states: bool = option(True, "also read the text encoder's word embeddings (its first hidden states), which "
                                     "keep motion words an image-only encoder learned to ignore")
    shift_rank: int = option(8, "basis kernels of the prompt-chosen depthwise 3D convolution that moves content "
                                "(0: one kernel for every prompt, which cannot tell left from right)")
    drift: bool = option(True, "each frame's features also move by a prompt-chosen velocity times the frame's time "
                               "from the clip's centre, so the noisy steps can place each frame on the prompt's path")

    def validate(self) -> None:
        if self.cond_dim < 1 or self.shift_rank < 0:
            raise UserError(f"layers.cond_dim must be >= 1 and layers.shift_rank >= 0, got {self.cond_dim}, {self.shift_rank}")


@dataclass
class TrainTemporalConfig(TrainingOptions):
    model: str = option("toyworld", "the frozen prior: preset, folder or hub id")
    data: str = option("toyworld", "'toyworld' (rendered clips) or a folder of video files (mp4, webm, mov, mkv, avi)")
    captions: bool = option(True, "train on captions; false = caption-free, on unlabeled video")
    frames: int = option(8, "frames per training clip")
    fps_choices: tuple[float, ...] = option((4.0, 8.0, 12.0), "frame rates clips are sampled at (fps conditioning)")
    bank_size: int = option(4000, "number of training clips (rendered, or cut from the video folder)")
    steps: int = option(6000, "optimisation steps")
    batch_size: int = option(16, "clips per step per process")
    lr: float = option(3e-4, "learning rate of the temporal layers (AdamW)")
    warmup_steps: int = option(200, "linear warm-up steps (then cosine decay to 10%)")
    caption_dropout: float = option(0.1, "fraction of captions replaced by '' (classifier-free guidance)")
    ema_decay: float = option(0.999, "EMA decay of the temporal weights (0 disables EMA)")
    layers: LayerOptions = group(LayerOptions, "the temporal layers' architecture")
    mask_mode: str = option("none", choices=MASK_MODES, help="known-frame conditioning to train: none, first (image-to-video), "
                                    "interpolation (every k-th frame known, k in 2..4) or mixed (half each)")
    init: Optional[str] = option(None, "temporal layers to start from (e.g. trained ones, to fine-tune for interpolation)")
    loss_weighting: str = option("v", choices=LOSS_WEIGHTINGS, help="v: the epsilon error weighted by 1/alpha_bar(t) (clipped at max_loss_weight), "
                                      "which weights the noisy steps where layout and motion are decided; eps: plain "
                                      "DDPM (a v-prediction prior trains against v, its error counted in epsilon units)")
    max_loss_weight: float = option(20.0, "clip of the v weighting's 1/alpha_bar(t)")
    noise_start: float = option(0.5, "fraction of clips trained as the sampler's first steps see them: pure noise in, "
                                      "at t in noise_start_timesteps, target the noise that would make it from the clip")
    noise_start_timesteps: tuple[int, int] = option((900, 1000), "[first, last) timesteps of the noise_start clips")

    def validate(self) -> None:
        super().validate()
        self.layers.validate()
        for name in ("frames", "bank_size", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.fps_choices or min(self.fps_choices) <= 0:
            raise UserError("fps_choices must list positive frame rates")
        if self.max_loss_weight < 1:
            raise UserError(f"max_loss_weight must be at least 1, got {self.max_loss_weight}")
        first, last = self.noise_start_timesteps if len(self.noise_start_timesteps) == 2 else (-1, -1)
        if not 0 <= first < last:
            raise UserError(f"noise_start_timesteps must be [first, last) with 0 <= first < last, "
                            f"got {list(self.noise_start_timesteps)}")
        if not 0 <= self.noise_start <= 1:
            raise UserError(f"noise_start is a fraction of clips in [0, 1], got {self.noise_start}")
        if self.data != "toyworld" and not Path(self.data).is_dir():
            raise UserError(f"data={self.data} is neither 'toyworld' nor a folder of videos")
        if self.init is not None and not is_temporal_folder(self.init):
            raise UserError(f"init={self.init} is not a folder of temporal layers ({WEIGHTS_NAME} + {CONFIG_NAME}, "
                            "made by `python run.py train temporal`)")

    @property
    def stage(self) -> str:
        """The run's and its checkpoints' name."""
        return "temporal" if self.mask_mode == "none" else "interpolation"


@dataclass
class TrainInterpolationConfig(TrainTemporalConfig):
    """The masked-frame model (interpolate=, image=): start it from trained temporal layers with init=FOLDER."""

    steps: int = option(4000, "optimisation steps")
    # interpolate=k runs the in-between pass at k times the clip's rate: train the rates it sees (8 fps x 4 = 32)
    fps_choices: tuple[float, ...] = option((4.0, 8.0, 12.0, 16.0, 24.0, 32.0), "frame rates clips are sampled at "
                                                                                "(fps conditioning)")
    mask_mode: str = option("mixed", choices=MASK_MODES, help="known-frame conditioning to train: first (image-to-video), interpolation "
                                     "(every k-th frame known, k in 2..4) or mixed (half each)")
