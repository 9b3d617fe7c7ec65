# CMake toolchain for cross-building mlx_k2's CPU kernels (mlx_k2/kernels/CMakeLists.txt) for arm64 Linux
# with Debian's cross compiler (apt install g++-aarch64-linux-gnu). Used by scripts/check_arm64.sh, which
# also points Python_EXECUTABLE at the emulated arm64 interpreter (so nanobind reads the arm64 SOABI and
# headers) and MLX_DIR at the aarch64 mlx wheel's CMake package.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Programs (the emulated python wrapper, cmake's helpers) are the host's; libraries and packages are found
# where the script points (MLX_DIR, the interpreter's own include directory), never in the host's /usr.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
