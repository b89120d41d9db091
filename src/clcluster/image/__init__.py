"""Image operations: Fourier shifts and rotations, filters, masks, the CTF."""
