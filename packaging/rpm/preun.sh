# bypassd %preun ($1: 0 = erase, 1 = upgrade). Like %systemd_preun: on erase stop
# and disable the unit. RPM has no separate purge, so erase also removes the pinned
# datapath, with the daemon's own safe detach (unpin only: accelerated connections
# finish intact), while the binary is still installed.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now bypassd.service >/dev/null 2>&1 || :
    /usr/sbin/bypassd --detach --config /etc/bypassd/bypassd.toml || :
fi
