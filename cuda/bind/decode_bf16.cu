#include "decode_launch.cuh"

namespace pscuda {
template void decode_dtype<ps::DT_BF16>(const DecodeArgs &);
}
