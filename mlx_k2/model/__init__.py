"""The model's math: weight matrices and their kernels, the forward pass, a layer's weights fetched for a step."""
