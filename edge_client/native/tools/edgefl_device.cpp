// edgefl-device: one native device on the command line (the C API of edgefl_device.h).
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "edgefl_device.h"

namespace {

edgefl_device* running = nullptr;

void on_signal(int) {
  // Only an atomic flag is set inside: the device publishes "offline" and stops by itself.
  if (running != nullptr) edgefl_device_stop(running);
}

const char kUsage[] =
    "usage: edgefl-device --id ID --federation NAME --artifacts DIR --data PARTITION\n"
    "                     [--host 127.0.0.1] [--port 1883] [--state-dir DIR] [--seed N]\n"
    "                     [--ca ca.crt --cert client.crt --key client.key] [--signing-key signing.key]\n";

int fail(const std::string& message) {
  std::fprintf(stderr, "edgefl-device: %s\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  const char* known[] = {"--id", "--federation", "--artifacts", "--data", "--host", "--port",
                         "--state-dir", "--seed", "--ca", "--cert", "--key", "--signing-key"};
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    bool ok = false;
    for (const char* k : known) ok = ok || flag == k;
    if (!ok) return fail("unknown option " + flag + " (see --help)");
    if (i + 1 >= argc) return fail(flag + " needs a value");
    args[flag] = argv[++i];
  }
  for (const char* required : {"--id", "--federation", "--artifacts", "--data"})
    if (!args.count(required)) return fail(std::string("missing ") + required + " (see --help)");
  auto number = [&](const char* flag, long long fallback, long long low, long long high) {
    if (!args.count(flag)) return fallback;
    char* end = nullptr;
    long long v = std::strtoll(args[flag].c_str(), &end, 10);
    if (*end != '\0' || v < low || v > high) {
      std::fprintf(stderr, "edgefl-device: %s must be an integer in %lld..%lld\n", flag, low, high);
      std::exit(2);
    }
    return v;
  };
  auto opt = [&](const char* flag) { return args.count(flag) ? args[flag].c_str() : nullptr; };
  if ((opt("--cert") || opt("--key")) && !opt("--ca")) return fail("--cert and --key need --ca");

  edgefl_device_config config{};
  config.device_id = args["--id"].c_str();
  config.federation = args["--federation"].c_str();
  config.artifact_dir = args["--artifacts"].c_str();
  config.host = args.count("--host") ? args["--host"].c_str() : "127.0.0.1";
  config.port = static_cast<int>(number("--port", opt("--ca") ? 8883 : 1883, 1, 65535));
  config.state_dir = opt("--state-dir");
  config.ca_file = opt("--ca");
  config.cert_file = opt("--cert");
  config.key_file = opt("--key");
  config.signing_key_file = opt("--signing-key");
  config.seed = static_cast<uint64_t>(number("--seed", 0, 0, (1LL << 62)));

  edgefl_device* device = edgefl_device_create(&config);
  if (device == nullptr) return fail(edgefl_last_error());
  if (edgefl_device_load_data(device, args["--data"].c_str()) != 0) {
    std::string reason = edgefl_last_error();
    edgefl_device_destroy(device);
    return fail(reason);
  }
  running = device;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  int rounds = edgefl_device_run(device);
  running = nullptr;
  std::string reason = rounds < 0 ? edgefl_last_error() : "";
  edgefl_device_destroy(device);
  if (rounds < 0) {
    std::fprintf(stderr, "edgefl-device: %s\n", reason.c_str());
    return 1;
  }
  std::printf("%s: trained %d rounds\n", args["--id"].c_str(), rounds);
  return 0;
}
