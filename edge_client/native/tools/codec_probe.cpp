// edgefl-codec-probe: the codec's C++ functions the C API does not expose, for
// tests/test_native_codec.py (encode_status, new_update_id, encode_global, ...).
#include <iostream>
#include "codec.hpp"
#include "safetensors.hpp"
int main(int argc, char** argv) {
  const std::string cmd = argv[1];
  try {
    if (cmd == "status") {
      std::optional<std::string> problem;
      if (argc > 4) problem = argv[4];
      std::cout << edgefl::encode_status(argv[2][0] == '1', argv[3], problem);
    } else if (cmd == "update-id") {
      std::cout << edgefl::new_update_id(argv[2], std::stoll(argv[3]), argv[4]);
    } else if (cmd == "reencode-global") {
      const auto m = edgefl::decode_global(edgefl::read_file(argv[2]));
      edgefl::write_file_atomic(argv[3], edgefl::encode_global(m));
    } else if (cmd == "start-adapter") {
      const auto m = edgefl::decode_global(edgefl::read_file(argv[2]));
      edgefl::write_safetensors_file(argv[3], m.start_adapter(argv[4], argv[5]), {{"k", "v"}});
    } else if (cmd == "dense-residual") {
      const auto m = edgefl::decode_residual(edgefl::read_file(argv[2]));
      edgefl::write_safetensors_file(argv[3], edgefl::dense_residual(m.residual));
    } else if (cmd == "copy") {
      std::map<std::string, std::string> metadata;
      const auto tensors = edgefl::read_safetensors_file(argv[2], &metadata);
      edgefl::write_safetensors_file(argv[3], tensors, metadata);
    }
  } catch (const std::exception& exc) {
    std::cerr << exc.what() << "\n";
    return 1;
  }
  return 0;
}
