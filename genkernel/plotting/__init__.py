"""matplotlib figure functions, one module per area (core, diffusion, gan). Import the module you need."""
