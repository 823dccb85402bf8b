// lora/optim.hpp: the training toolkit: optimizers (SGD, Adam, AdamW), LoRA+, gradient clipping,
// learning-rate schedules, the guarded step and gradient accumulation. Needs nothing but Eigen.
// Checkpoints are separate: <lora/io/checkpoint.hpp>.
#pragma once

#include "optim/adam.hpp"
#include "optim/clip.hpp"
#include "optim/grad_accumulator.hpp"
#include "optim/lora_plus.hpp"
#include "optim/optimizer.hpp"
#include "optim/schedule.hpp"
#include "optim/sgd.hpp"
#include "optim/step_guard.hpp"
