import resource

from phalanx.runtime import cpu


def test_max_processes_is_8_per_core_within_the_open_file_limit(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 4)
    for soft, most in ((1024, 32), (40, 10), (2, 1), (resource.RLIM_INFINITY, 32)):
        monkeypatch.setattr(resource, "getrlimit", lambda _, soft=soft: (soft, resource.RLIM_INFINITY))
        assert cpu.max_processes() == most
