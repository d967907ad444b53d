# bypassd %postun ($1: 0 = erase, 1 = upgrade). Like %systemd_postun_with_restart:
# restart the unit after an upgrade (the pinned datapath keeps accelerating
# meanwhile). On erase, delete the state directory (runtime policy).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ]; then
    systemctl try-restart bypassd.service >/dev/null 2>&1 || :
fi
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/bypassd
fi
