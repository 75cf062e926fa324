"""Pure tensor math for RLHF-PPO: masked reductions, KL, advantages and losses."""
