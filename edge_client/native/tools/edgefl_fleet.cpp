// edgefl-fleet: many native devices in one process, sharing one training program (emulation).
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "agent.hpp"
#include "data.hpp"

namespace {

std::atomic<bool> stopping{false};
void on_signal(int) { stopping = true; }

const char kUsage[] =
    "usage: edgefl-fleet --federation NAME --artifacts DIR --data-dir DIR --first I --count N\n"
    "                    [--host 127.0.0.1] [--port 1883] [--state-dir DIR] [--seed N]\n"
    "Devices dev-<I>..dev-<I+N-1> (5 digits), each reading <data-dir>/<id>.data.safetensors.\n";

int fail(const std::string& message) {
  std::fprintf(stderr, "edgefl-fleet: %s\n", message.c_str());
  return 2;
}

// Each device holds a socket (and the broker one per device): allow as many as the hard limit.
void raise_file_limit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (flag.rfind("--", 0) != 0 || i + 1 >= argc) return fail("bad option " + flag + " (see --help)");
    args[flag] = argv[++i];
  }
  for (const char* required : {"--federation", "--artifacts", "--data-dir", "--first", "--count"})
    if (!args.count(required)) return fail(std::string("missing ") + required + " (see --help)");
  long first = std::strtol(args["--first"].c_str(), nullptr, 10);
  long count = std::strtol(args["--count"].c_str(), nullptr, 10);
  if (first < 0 || count < 1 || first + count > 100000) return fail("--first/--count out of range");
  raise_file_limit();

  std::vector<std::unique_ptr<edgefl::Agent>> agents;
  try {
    auto trainer = std::make_shared<edgefl::Trainer>(args["--artifacts"], 0.05);
    auto lock = std::make_shared<std::mutex>();
    for (long i = first; i < first + count; ++i) {
      char id[16];
      std::snprintf(id, sizeof id, "dev-%05ld", i);
      edgefl::AgentConfig c;
      c.device_id = id;
      c.federation = args["--federation"];
      c.artifact_dir = args["--artifacts"];
      c.host = args.count("--host") ? args["--host"] : "127.0.0.1";
      c.port = args.count("--port") ? std::atoi(args["--port"].c_str()) : 1883;
      c.state_dir = args.count("--state-dir") ? args["--state-dir"] : "";
      c.seed = std::strtoull(args.count("--seed") ? args["--seed"].c_str() : "0", nullptr, 10) ^
               static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
      // Thousands of idle devices: retry unsent updates every few seconds, not twice a second.
      c.poll_ms = 5000;
      agents.push_back(std::make_unique<edgefl::Agent>(c, trainer, lock));
      agents.back()->set_tasks(
          edgefl::read_partition(args["--data-dir"] + "/" + id + ".data.safetensors"));
    }
  } catch (const std::exception& exc) {
    return fail(exc.what());
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::atomic<int> failed{0}, rounds{0};  // rounds: summed over devices
  std::vector<std::thread> threads;
  for (auto& agent : agents) {
    threads.emplace_back([&, a = agent.get()] {
      try {
        rounds += a->run();
      } catch (const std::exception& exc) {
        ++failed;
        edgefl::log_line("ERROR", "fleet", exc.what());
      }
    });
    // Connections in small bursts, so the broker's accept queue is not stormed.
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // Signals only set a flag; this thread turns it into each device's clean stop.
  std::thread watcher([&] {
    while (!stopping) std::this_thread::sleep_for(std::chrono::milliseconds(200));
    for (auto& agent : agents) agent->stop();
  });
  for (auto& t : threads) t.join();
  stopping = true;
  watcher.join();
  std::printf("%ld devices: %d device-rounds trained, %d failed\n", count, rounds.load(),
              failed.load());
  return failed ? 1 : 0;
}
